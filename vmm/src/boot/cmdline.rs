//! The guest kernel command line: the user's (or the default) plus what the
//! VMM must add. Additions go before a ` -- ` separator so that they never
//! become arguments of the guest's init.

use crate::arch::layout::CMDLINE_MAX_SIZE;

/// Used when the user gives no command line. `reboot=k` makes a guest
/// reboot reach the i8042 reset line, which ends the VMM; one UART keeps
/// the emulated probe short.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CmdlineError {
    #[error("the kernel command line is {0} bytes with the VMM's additions; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    TooLong(usize),
}

/// Appends `extra` parameters to the kernel part of `user` (or the default),
/// skipping any the user already gave verbatim.
pub fn compose(user: Option<&str>, extra: &[String]) -> Result<String, CmdlineError> {
    let base = user.unwrap_or(DEFAULT_CMDLINE).trim();
    let (kernel_part, init_part) = split_init_args(base);
    let mut params: Vec<&str> = kernel_part.split_whitespace().collect();
    for p in extra {
        if !params.contains(&p.as_str()) {
            params.push(p);
        }
    }
    let mut out = params.join(" ");
    if let Some(init) = init_part {
        out.push_str(" -- ");
        out.push_str(init);
    }
    if out.len() >= CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong(out.len()));
    }
    Ok(out)
}

/// Splits at the first standalone `--`; what follows goes to init.
fn split_init_args(cmdline: &str) -> (&str, Option<&str>) {
    let mut offset = 0;
    for word in cmdline.split(' ') {
        if word == "--" {
            let rest = cmdline[offset + 2..].trim();
            return (cmdline[..offset].trim(), Some(rest));
        }
        offset += word.len() + 1;
    }
    (cmdline, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn default_when_absent() {
        assert_eq!(compose(None, &[]).unwrap(), DEFAULT_CMDLINE);
        assert!(compose(None, &s(&["noxsave"])).unwrap().ends_with(" noxsave"));
    }

    #[test]
    fn appended_to_user_line() {
        assert_eq!(
            compose(Some("console=ttyS0 root=/dev/vda"), &s(&["noxsave"])).unwrap(),
            "console=ttyS0 root=/dev/vda noxsave"
        );
    }

    #[test]
    fn additions_stay_before_init_arguments() {
        assert_eq!(
            compose(
                Some("console=ttyS0 -- --verbose x"),
                &s(&["noxsave", "virtio_mmio.device=4K@0xd0000000:5"])
            )
            .unwrap(),
            "console=ttyS0 noxsave virtio_mmio.device=4K@0xd0000000:5 -- --verbose x"
        );
        assert_eq!(compose(Some("-- a"), &s(&["p"])).unwrap(), "p -- a");
        // `--` inside a word is not a separator.
        assert_eq!(compose(Some("a=--b"), &s(&["p"])).unwrap(), "a=--b p");
    }

    #[test]
    fn duplicates_are_not_repeated() {
        assert_eq!(
            compose(Some("noxsave quiet"), &s(&["noxsave"])).unwrap(),
            "noxsave quiet"
        );
    }

    #[test]
    fn length_limit_counts_additions() {
        let long = "x".repeat(CMDLINE_MAX_SIZE - 5);
        assert!(matches!(
            compose(Some(&long), &s(&["noxsave"])),
            Err(CmdlineError::TooLong(_))
        ));
    }
}
