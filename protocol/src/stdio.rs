//! Stdio streams. The host opens each one to the agent's [`STDIO_PORT`]
//! and names it with a fresh random token in an [`Attach`] frame; the agent
//! keeps the stream until a `create` or `exec` names the token, and
//! answers [`Attached`] once it is kept. The host sends the request only
//! after every answer, so the agent never waits for a stream, and nothing
//! in the guest connects out: no guest timer guards a container's start,
//! and a guest process cannot race for another process's stdio (only the
//! host, CID 2, reaches the port).

use serde::{Deserialize, Serialize};

use crate::messages::ValidationError;
pub use crate::messages::{check_token, TOKEN_HEX_LEN};

/// The vsock port the agent accepts stdio streams on.
pub const STDIO_PORT: u32 = 1025;

/// The first frame on a stdio stream, host to agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub token: String,
}

/// The agent's answer on the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attached {
    /// Kept: a request may name the token now.
    Ok,
    Error {
        message: String,
    },
}

impl Attach {
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_token("token", &self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        let ok = "0123456789abcdef0123456789abcdef";
        Attach { token: ok.into() }.validate().unwrap();
        for bad in [
            "",
            "0123",
            &ok.to_uppercase(),
            &format!("{ok}0"),
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(Attach { token: bad.into() }.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wire_format() {
        assert_eq!(serde_json::to_string(&Attached::Ok).unwrap(), r#"{"result":"ok"}"#);
        assert!(serde_json::from_str::<Attach>(r#"{"token":"x","port":1}"#).is_err());
    }
}
