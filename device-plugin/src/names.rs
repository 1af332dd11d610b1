//! Human-readable vendor and device names from the PCI ID Repository (compiled in).

pub fn vendor_name(vendor: u16) -> Option<&'static str> {
    pci_ids::Vendors::iter()
        .find(|v| v.id() == vendor)
        .map(|v| v.name())
}

pub fn device_name(vendor: u16, device: u16) -> Option<&'static str> {
    pci_ids::Device::from_vid_pid(vendor, device).map(|d| d.name())
}

#[cfg(test)]
mod tests {
    #[test]
    fn knows_the_igb_parts() {
        assert!(super::vendor_name(0x8086).unwrap().contains("Intel"));
        assert!(super::device_name(0x8086, 0x10c9)
            .unwrap()
            .contains("82576"));
        assert!(super::device_name(0x8086, 0x10ca)
            .unwrap()
            .contains("Virtual Function"));
        assert_eq!(super::device_name(0xfffe, 0x0001), None);
    }
}
