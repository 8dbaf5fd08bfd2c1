//! agiproxy's control plane: the HTTP control API (served over the
//! [`ControlPlane`] interface the proxy implements) and the `ctl` client
//! that drives one replica or a whole cluster.

pub mod api;
pub mod budget;
pub mod client;
mod conn;
pub mod ctl;
pub mod files;
mod handlers;
pub mod plane;
pub mod server;
pub mod socket;
pub mod throttle;
pub mod tls;
pub mod token;

pub use plane::{ControlError, ControlPlane};
pub use server::{ControlServer, ServeError, ServeOptions};
