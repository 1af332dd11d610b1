//! The Container Network Interface protocol as trellis speaks it: spec versions, error
//! JSON, results and their conversions, network configurations and the plugin
//! environment. Types only: running plugins is `trellis-delegate`, the shim is
//! `trellis-shim`.

pub mod conf;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use conf::NetConfList;
pub use env::{CniArgs, CniEnv, Command};
pub use error::{CniError, ErrorCode};
pub use result::CniResult;
pub use version::Version;
