pub mod align;
pub mod bench;
pub mod classify;
pub mod embed;
pub mod info;
pub mod llm_tokens;
pub mod similarity;
pub mod train;
