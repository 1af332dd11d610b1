//! The trellis node agent: answers the `trellis-cni` shim, resolves each pod's networks
//! and runs their attachments.

pub mod acl;
pub mod bandwidth;
pub mod builtins;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod handler;
pub mod link;
pub mod logical;
pub mod lpm_baseline;
pub mod metrics;
pub mod nad;
pub mod netns;
pub mod network_status;
pub mod node_conf;
pub mod records;
pub mod routes;
pub mod selection;
pub mod server;
pub mod source;
pub mod sriov;
pub mod table;
pub mod tenancy;
pub mod vhostuser;
