pub mod bench;
pub mod classify;
pub mod embed;
pub mod info;
pub mod serve;
pub mod similarity;
