//! The first exchange on the request stream: each side sends a [`Hello`],
//! and a peer speaking another protocol version is refused with a message
//! that says which versions met, so a stale guest image is found at once.

use serde::{Deserialize, Serialize};

/// Bumped on any change to the messages that an older peer would misread.
pub const PROTOCOL_VERSION: u32 = 2;
pub const PROTOCOL_NAME: &str = "bulkhead-agent";
/// Starts the version stamp the agent's binary carries
/// (`bulkhead-agent-version=X.Y.Z;protocol=N`, NUL-terminated), so the host
/// can tell which agent an initramfs holds without booting it.
pub const AGENT_STAMP_PREFIX: &str = "bulkhead-agent-version=";

/// The agent version and protocol number in a stamp's text (after
/// [`AGENT_STAMP_PREFIX`]), when it is well formed.
pub fn parse_agent_stamp(text: &str) -> Option<(&str, u32)> {
    let (version, protocol) = text.split_once(";protocol=")?;
    let ok = !version.is_empty() && version.len() <= 32 && version.bytes().all(|b| b.is_ascii_graphic() && b != b';');
    Some((version, protocol.parse().ok()?)).filter(|_| ok)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: String,
    pub version: u32,
    /// The sender's build, for the error message only.
    pub software: String,
}

impl Hello {
    pub fn ours(software: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_NAME.into(),
            version: PROTOCOL_VERSION,
            software: software.chars().take(64).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("the peer speaks {0:?}, not {PROTOCOL_NAME}")]
    WrongProtocol(String),
    #[error(
        "protocol version mismatch: the peer ({software}) speaks version {theirs}, this side speaks version {ours}; \
         use a guest image built with the same Bulkhead release"
    )]
    Version { ours: u32, theirs: u32, software: String },
}

/// Accepts the peer's hello or says why not.
pub fn check(peer: &Hello) -> Result<(), HandshakeError> {
    if peer.protocol != PROTOCOL_NAME {
        return Err(HandshakeError::WrongProtocol(peer.protocol.chars().take(64).collect()));
    }
    if peer.version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            ours: PROTOCOL_VERSION,
            theirs: peer.version,
            software: peer.software.chars().take(64).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stamps_parse_or_not() {
        assert_eq!(parse_agent_stamp("0.1.0;protocol=2"), Some(("0.1.0", 2)));
        assert_eq!(parse_agent_stamp("0.1.0;protocol=x"), None);
        assert_eq!(parse_agent_stamp(";protocol=2"), None);
        assert_eq!(parse_agent_stamp("0 1;protocol=2"), None);
    }

    #[test]
    fn same_version_is_accepted() {
        check(&Hello::ours("bulkhead 0.1.0")).unwrap();
    }

    #[test]
    fn mismatch_is_refused_with_both_versions() {
        let peer = Hello {
            version: PROTOCOL_VERSION + 1,
            ..Hello::ours("agent 9.9")
        };
        let e = check(&peer).unwrap_err().to_string();
        assert!(e.contains(&format!("version {}", PROTOCOL_VERSION + 1)), "{e}");
        assert!(e.contains(&format!("speaks version {PROTOCOL_VERSION}")), "{e}");
        assert!(e.contains("agent 9.9"), "{e}");
        let other = Hello {
            protocol: "kata-agent".into(),
            ..Hello::ours("x")
        };
        assert!(matches!(check(&other), Err(HandshakeError::WrongProtocol(_))));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<Hello, _> =
            serde_json::from_str(r#"{"protocol":"bulkhead-agent","version":1,"software":"x","extra":1}"#);
        assert!(r.is_err());
    }
}
