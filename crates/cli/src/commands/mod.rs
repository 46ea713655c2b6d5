pub mod bench;
pub mod classify;
pub mod embed;
pub mod index;
pub mod info;
pub mod interchange;
pub mod search;
pub mod similarity;
