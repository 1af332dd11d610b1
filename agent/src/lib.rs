//! The trellis node agent: answers the `trellis-cni` shim, resolves each pod's networks
//! and runs their attachments.
//!
//! Laid out by concern: `verbs` (the CNI verbs) and `dynamic` (hot-plug) change pods'
//! networks through `engine` (one attachment at a time: plan, make, undo, record);
//! `kinds` are the attachment kinds run in-process (SR-IOV, vhost-user; delegates are
//! exec'd by `trellis_delegate`); `dataplane` loads the eBPF programs and keeps
//! their maps; `source` is where NADs and pods come from; the rest reads one piece of
//! untrusted input each (`nad`, `selection`, `acl`, `bandwidth`, `logical`,
//! `tenancy`) or is the agent's own plumbing.

pub mod acl;
pub mod bandwidth;
pub mod choice;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod dynamic;
pub mod engine;
pub mod kinds;
pub mod link;
pub mod logical;
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
pub mod table;
pub mod tenancy;
pub mod verbs;
