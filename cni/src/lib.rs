//! The Container Network Interface protocol as trellis speaks it: spec versions, error
//! JSON, results and their conversions, network configurations, the plugin environment,
//! running a plugin or a whole conflist (as libcni does), and the wire format between
//! the `trellis-cni` shim and the agent.

pub mod conf;
pub mod env;
pub mod error;
pub mod host;
pub mod invoke;
pub mod result;
pub mod version;
pub mod wire;

pub use conf::NetConfList;
pub use env::{CniArgs, CniEnv, Command};
pub use error::{CniError, ErrorCode};
pub use result::CniResult;
pub use version::Version;
