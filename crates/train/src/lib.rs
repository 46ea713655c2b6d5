//! Training on top of visenc's encoders, with candle's autograd: contrastive image-text losses (CLIP's
//! symmetric InfoNCE and SigLIP's sigmoid loss, with learnable temperature and bias and a locked-image
//! mode), linear probes (softmax regression on frozen embeddings, solved with L-BFGS) and a locked-image
//! alignment of a text encoder to an image space (a contrastively trained projection); and fine-tuning
//! of ViT classifiers (last blocks or LoRA) with our own AdamW, resumable checkpoints and augmentation.

pub mod align;
pub mod augment;
pub mod contrastive;
pub mod data;
mod error;
pub mod finetune;
pub mod io;
pub mod lbfgs;
pub mod optim;
pub mod probe;

pub use contrastive::{clip_loss, siglip_loss, Contrastive, LossKind};
pub use data::{stratified_split, LabelledImages, Split};
pub use error::{Result, TrainError};
pub use probe::{LinearHead, ProbeConfig};
