//! A two-tower image-text model ([`visenc_weights::Layout::TwoTower`]): any image checkpoint as the
//! image tower, a sentence encoder as the text tower, and a trained linear projection of the text
//! embedding into the image embedding space (LiT: the image side stays as it was). Image embeddings are
//! the image tower's own (`ImageFeatures::embedding`, e.g. EfficientNet-Lite0's 1280-d pooled feature
//! that its classifier scores); text embeddings are `text_projection @ sentence_embedding`; zero-shot
//! scoring uses the learnt `logit_scale` (and `logit_bias` after SigLIP training).

use candle_core::{DType, Tensor};
use visenc_weights::{Checkpoint, LoadPolicy, LoadReport, Weights};

use crate::api::{Scoring, TextEncoder, TextFeatures};
use crate::error::{file_err, Result};
use crate::linear::Linear;
use crate::sentence::TextTower;
use crate::LoadedModel;

/// The text tower followed by the projection.
struct ProjectedText {
    tower: Box<dyn TextEncoder>,
    projection: Linear,
}

impl TextEncoder for ProjectedText {
    /// `pooled` is the text tower's sentence embedding, `projected` its image-space projection.
    fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<TextFeatures> {
        let pooled = self.tower.encode_text(ids, mask)?.projected;
        let projected = self.projection.forward(&pooled)?;
        Ok(TextFeatures { pooled, projected })
    }

    fn context_length(&self) -> usize {
        self.tower.context_length()
    }
}

/// Appends `part`'s entries to `into`, each name prefixed with the tower it came from.
fn merge(into: &mut LoadReport, part: LoadReport, tower: &str) {
    let named = |v: Vec<String>| v.into_iter().map(move |n| format!("{tower}: {n}"));
    into.missing.extend(named(part.missing));
    into.unexpected.extend(named(part.unexpected));
    into.mismatched.extend(
        part.mismatched
            .into_iter()
            .map(|(n, a, b)| (format!("{tower}: {n}"), a, b)),
    );
}

/// A scalar tensor of the projection file, `None` when absent.
fn scalar(w: &Weights, name: &str) -> Result<Option<f32>> {
    match w.shape_of(name) {
        None => Ok(None),
        Some(s) if s.iter().product::<usize>() == 1 => {
            let t = w.root().get(s, name)?;
            Ok(Some(
                t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0],
            ))
        }
        Some(s) => Err(file_err(
            w.source(),
            format!("`{name}` must be a scalar, not {s:?}"),
        )),
    }
}

/// Loads both towers with the settings (dtype, device, precision) of `w`, the projection file's
/// weights, and checks that the projection fits them.
pub(crate) fn load(
    ckpt: &Checkpoint,
    w: &Weights,
    policy: LoadPolicy,
) -> Result<(LoadedModel, LoadReport)> {
    let towers = ckpt.towers()?;
    let open = |c: &Checkpoint| -> Result<Weights> {
        Ok(c.load_weights(w.dtype(), w.device())?
            .with_precision(w.precision()))
    };
    let (image, image_report) = crate::load(&towers.image, &open(&towers.image)?, policy)?;
    let (text, text_report) = crate::load_text(&towers.text, &open(&towers.text)?, policy)?;
    let TextTower {
        encoder,
        dim: text_dim,
        architecture: text_arch,
        parameters: text_parameters,
    } = text;
    let image_dim = image.info.projection_dim.unwrap_or(image.info.hidden_size);
    let file = ckpt
        .weight_files
        .first()
        .cloned()
        .unwrap_or_else(|| ckpt.dir.clone());
    let shape = w
        .shape_of("text_projection")
        .ok_or_else(|| file_err(&file, "no `text_projection` tensor"))?;
    if shape != [image_dim, text_dim] {
        return Err(file_err(
            &file,
            format!(
                "`text_projection` is {shape:?}, but the image tower {} gives {image_dim}-d embeddings \
                 and the text tower {} {text_dim}-d ones: it must be [{image_dim}, {text_dim}]",
                towers.image.spec, towers.text.spec
            ),
        ));
    }
    let weight = w.root().get((image_dim, text_dim), "text_projection")?;
    let projection = Linear::with_precision(weight, None, w.precision())?;
    let logit_scale =
        scalar(w, "logit_scale")?.ok_or_else(|| file_err(&file, "no `logit_scale` tensor"))?;
    let scoring = match scalar(w, "logit_bias")? {
        None => Scoring::Softmax { logit_scale },
        Some(logit_bias) => Scoring::Sigmoid {
            logit_scale,
            logit_bias,
        },
    };
    let mut report = w.finish(policy)?;
    merge(&mut report, image_report, "image tower");
    merge(&mut report, text_report, "text tower");
    let text: Box<dyn TextEncoder> = Box::new(ProjectedText {
        tower: encoder,
        projection,
    });
    let mut info = image.info;
    info.architecture = format!("two-tower: {} + {text_arch}", info.architecture);
    info.family = "two_tower";
    info.projection_dim = Some(image_dim);
    info.scoring = Some(scoring);
    info.parameters += text_parameters + w.used_parameters();
    info.text_context_length = Some(text.context_length());
    Ok((
        LoadedModel {
            image: image.image,
            text: Some(text),
            info,
        },
        report,
    ))
}
