//! Devices for pods: SR-IOV VFs (and PFs without VFs) found in sysfs and DPDK
//! vhost-user sockets found in directories, grouped into resource pools by
//! sriov-network-device-plugin compatible selectors.

pub mod config;
pub mod fixture;
pub mod glob;
pub mod names;
pub mod pci;
pub mod pool;
pub mod sysfs;
pub mod vhost;
