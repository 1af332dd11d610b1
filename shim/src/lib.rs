//! The `trellis-cni` shim's side of the agent: `wire`, the one request and response
//! that cross the agent's unix socket. The binary is `src/main.rs`.

pub mod wire;
