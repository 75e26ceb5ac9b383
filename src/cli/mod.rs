//! Parts of the command line that are not argument parsing: talking to a
//! running node's admin socket (`admin`) and rendering its reports
//! (`status`).

use super::*;

pub mod admin;
pub mod status;
