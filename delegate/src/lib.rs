//! How the agent runs CNI plugins (its delegates), as libcni would: `exec` runs one
//! plugin binary, or hands a type the agent runs itself to its `InProcessPlugins`;
//! `chain` runs a whole conflist; `host` resolves host paths when the agent runs in a
//! container.

pub mod chain;
pub mod exec;
pub mod host;

pub use exec::{InProcessPlugins, InvokeError, Invoker, Target};

#[cfg(test)]
mod tests;
