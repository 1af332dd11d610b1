//! CNI spec versions and which of them trellis accepts.

use std::fmt;

/// The newest spec version trellis implements.
pub const CURRENT: Version = Version(1, 1, 0);

/// Every version a configuration may name; results convert between 0.3.0 and up.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A parsed `cniVersion` ("major.minor.patch").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    /// Parses and checks that the version is one trellis supports.
    pub fn parse_supported(s: &str) -> Result<Version, String> {
        let v = Version::parse(s)?;
        if SUPPORTED.contains(&s) {
            Ok(v)
        } else {
            Err(format!(
                "cniVersion {s:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ))
        }
    }

    /// Parses any "a.b.c" version, supported or not.
    pub fn parse(s: &str) -> Result<Version, String> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 3 {
            return Err(format!(
                "cniVersion {s:?} is not of the form major.minor.patch"
            ));
        }
        let num = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("cniVersion {s:?} is not of the form major.minor.patch"))
        };
        Ok(Version(num(parts[0])?, num(parts[1])?, num(parts[2])?))
    }

    /// Results in this version carry `ips[].version` (0.3.x and 0.4.0 only).
    pub fn has_ip_version_field(self) -> bool {
        self < Version(1, 0, 0)
    }

    /// CHECK exists from 0.4.0 on; before that a plugin must not be asked.
    pub fn supports_check(self) -> bool {
        self >= Version(0, 4, 0)
    }

    /// DEL receives `prevResult` from 0.4.0 on.
    pub fn del_gets_prev_result(self) -> bool {
        self >= Version(0, 4, 0)
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn supports_status_gc(self) -> bool {
        self >= Version(1, 1, 0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The answer to VERSION.
pub fn version_info(requested: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": requested.unwrap_or("1.1.0"),
        "supportedVersions": SUPPORTED,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        assert!(Version::parse("0.4.0").unwrap() < Version::parse("1.0.0").unwrap());
        assert_eq!(Version::parse("1.1.0").unwrap(), CURRENT);
        assert!(Version::parse("1.0").is_err());
        assert!(Version::parse("a.b.c").is_err());
        assert!(Version::parse_supported("0.2.0")
            .unwrap_err()
            .contains("0.2.0"));
        assert!(Version::parse_supported("1.0.0").is_ok());
    }
}
