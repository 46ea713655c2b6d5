//! Finding checkpoints (local directories in Hugging Face, open_clip and timm layouts, or hub ids) and
//! loading their tensors with a strict report of what did not match.

mod checkpoint;
mod error;
mod hub;
mod lazy;
mod pth;
mod store;
mod two_tower;

pub use checkpoint::{Checkpoint, Layout};
pub use error::WeightsError;
pub use pth::load_pth;
pub use store::{LoadPolicy, LoadReport, Scope, Weights};
pub use two_tower::{Towers, TwoTowerConfig, PROJECTION_FILE, TWO_TOWER_MODEL_TYPE};
