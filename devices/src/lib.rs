//! The node's devices as the kernel shows them, shared by the device plugin (which
//! reports them to the kubelet) and the agent (which moves VFs into pods): PCI
//! addresses (`pci`), network devices and their SR-IOV state in sysfs (`sysfs`), and
//! which VFs the agent has placed in pods (`claims`). `fixture` (feature `fixture`)
//! lays out sysfs trees for tests and benchmarks.

pub mod claims;
#[cfg(any(test, feature = "fixture"))]
pub mod fixture;
pub mod pci;
pub mod sysfs;

pub use claims::VfClaims;
pub use pci::PciAddress;
