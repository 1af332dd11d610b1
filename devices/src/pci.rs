//! PCI addresses in sysfs form: `dddd:bb:dd.f`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a PCI address (want dddd:bb:dd.f, e.g. 0000:03:02.1)")]
pub struct BadPciAddress(pub String);

impl FromStr for PciAddress {
    type Err = BadPciAddress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPciAddress(s.to_string());
        let hex = |part: &str, len: usize| -> Result<u32, BadPciAddress> {
            if part.len() != len || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(part, 16).map_err(|_| bad())
        };
        let mut parts = s.split(':');
        let (Some(dom), Some(bus), Some(devfn), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let device = hex(dev, 2)?;
        let function = hex(func, 1)?;
        if device > 0x1f || function > 7 {
            return Err(bad());
        }
        Ok(PciAddress {
            domain: hex(dom, 4)? as u16,
            bus: hex(bus, 2)? as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl serde::Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let a: PciAddress = "0000:3b:02.7".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.device, a.function), (0, 0x3b, 2, 7));
        assert_eq!(a.to_string(), "0000:3b:02.7");
        assert_eq!("0000:3B:02.7".parse::<PciAddress>().unwrap(), a);
        for bad in [
            "3b:02.7",
            "0000:3b:02",
            "0000:3b:20.0",
            "0000:3b:02.8",
            "0000:3b:2.1",
            "x000:3b:02.1",
            "0000:3b:02.1:0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }
}
