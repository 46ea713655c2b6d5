//! MaxViT configuration as timm builds it: the dataclass defaults, then the architecture's preset,
//! then `pretrained_cfg` and the checkpoint's `model_args` (`conv_*` and `transformer_*` keys go to
//! the two sub-configs, as timm's `_overlay_kwargs` does). Every option that changes inference is
//! either honoured or refused by name.

use std::fmt::Display;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{config_err, ModelError, Result};
use crate::nn::Activation;

/// `MaxxVitConvCfg` fields that change inference.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L121
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct ConvCfg {
    block_type: String,
    pub expand_ratio: f64,
    pub expand_output: bool,
    pub kernel_size: usize,
    pub group_size: Option<usize>,
    pre_norm_act: bool,
    pub output_bias: bool,
    stride_mode: String,
    pool_type: String,
    pub padding: String,
    attn_early: bool,
    attn_layer: String,
    attn_act_layer: String,
    pub attn_ratio: f64,
    act_layer: String,
    norm_layer: String,
    norm_eps: Option<f64>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

impl Default for ConvCfg {
    fn default() -> Self {
        Self {
            block_type: "mbconv".into(),
            expand_ratio: 4.0,
            expand_output: true,
            kernel_size: 3,
            group_size: Some(1),
            pre_norm_act: false,
            output_bias: true,
            stride_mode: "dw".into(),
            pool_type: "avg2".into(),
            padding: String::new(),
            attn_early: false,
            attn_layer: "se".into(),
            attn_act_layer: "silu".into(),
            attn_ratio: 0.25,
            act_layer: "gelu".into(),
            norm_layer: String::new(),
            norm_eps: None,
            other: Map::new(),
        }
    }
}

impl ConvCfg {
    /// TF "SAME" padding (`padding='same'`) for the convolutions and the shortcut pooling.
    pub fn same(&self) -> bool {
        self.padding == "same"
    }

    /// BatchNorm eps: `__post_init__` defaults it to 1e-5 for MBConv blocks.
    pub fn eps(&self) -> f64 {
        self.norm_eps.unwrap_or(1e-5)
    }
}

/// `MaxxVitTransformerCfg` fields that change inference.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L87
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct TransformerCfg {
    pub dim_head: usize,
    /// qkv channels ordered per head (`[heads, q|k|v, dim_head]`) rather than `[q|k|v, heads, dim_head]`.
    pub head_first: bool,
    pub expand_ratio: f64,
    pub attn_bias: bool,
    pub rel_pos_type: String,
    partition_ratio: usize,
    window_size: Option<Pair>,
    grid_size: Option<Pair>,
    pub no_block_attn: bool,
    use_nchw_attn: bool,
    pub init_values: Option<f64>,
    act_layer: String,
    norm_layer: String,
    norm_layer_cl: String,
    pub norm_eps: f64,
    #[serde(flatten)]
    other: Map<String, Value>,
}

impl Default for TransformerCfg {
    fn default() -> Self {
        Self {
            dim_head: 32,
            head_first: true,
            expand_ratio: 4.0,
            attn_bias: true,
            rel_pos_type: "bias".into(),
            partition_ratio: 32,
            window_size: None,
            grid_size: None,
            no_block_attn: false,
            use_nchw_attn: false,
            init_values: None,
            act_layer: "gelu".into(),
            norm_layer: "layernorm2d".into(),
            norm_layer_cl: "layernorm".into(),
            norm_eps: 1e-6,
            other: Map::new(),
        }
    }
}

impl TransformerCfg {
    /// The (window, grid) partition sizes: as given, else `img_size // partition_ratio` for both.
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1417
    fn partitions(&self, img: (usize, usize)) -> Result<((usize, usize), (usize, usize))> {
        let (window, grid) = match (self.window_size, self.grid_size) {
            (Some(w), g) => (w.get(), g.unwrap_or(w).get()),
            (None, _) => {
                let r = self.partition_ratio.max(1);
                ((img.0 / r, img.1 / r), (img.0 / r, img.1 / r))
            }
        };
        if [window.0, window.1, grid.0, grid.1].contains(&0) {
            let reason = format!(
                "{img:?} is too small for partition_ratio {}",
                self.partition_ratio
            );
            return Err(config_err("img_size", reason));
        }
        Ok((window, grid))
    }
}

/// `MaxxVitCfg` fields and `MaxxVit.__init__` arguments (the preset sets every one).
#[derive(Debug, Deserialize)]
pub(super) struct Args {
    pub embed_dim: Vec<usize>,
    pub depths: Vec<usize>,
    block_type: Vec<Value>,
    pub stem_width: Pair,
    pub stem_bias: bool,
    pub head_hidden_size: Option<usize>,
    pub img_size: Pair,
    pub in_chans: usize,
    pub num_classes: usize,
    global_pool: String,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// timm's `to_2tuple` arguments: one number or `[height, width]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub(super) enum Pair {
    One(usize),
    Two([usize; 2]),
}

impl Pair {
    pub fn get(self) -> (usize, usize) {
        match self {
            Self::One(v) => (v, v),
            Self::Two([a, b]) => (a, b),
        }
    }
}

/// Everything a MaxViT is built from.
pub(super) struct Config {
    pub a: Args,
    pub c: ConvCfg,
    pub t: TransformerCfg,
    pub acts: Activations,
    /// Block (window) and grid partition sizes.
    pub window: (usize, usize),
    pub grid: (usize, usize),
}

/// The activations of the MBConv blocks (and stem), of their SE gates, and of the attention MLPs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Activations {
    pub conv: Activation,
    pub se: Activation,
    pub mlp: Activation,
}

fn unsupported(option: &str, value: impl Display) -> ModelError {
    ModelError::Unsupported {
        what: "timm MaxViT option",
        name: format!("{option} = {value}"),
    }
}

/// The preset of an architecture name: [base args, conv cfg, transformer cfg] of timm's
/// `model_cfgs` entry for the name without its resolution suffix (`maxvit_tiny_tf_224` ->
/// `maxvit_tiny_tf`). `rmlp` and `pm` names are described so that their options are refused by name.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L2082
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1783 (_rw_max_cfg)
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1870 (_tf_cfg)
fn preset(arch: &str) -> Result<[Map<String, Value>; 3]> {
    let (variant, res) = arch.rsplit_once('_').unwrap_or((arch, ""));
    const SMALL: [usize; 4] = [2, 2, 5, 2];
    const DEEP: [usize; 4] = [2, 6, 14, 2];
    let (dims, depths, stem, head): ([usize; 4], _, Value, Option<usize>) = match variant {
        "maxvit_tiny_tf" => ([64, 128, 256, 512], SMALL, json!(64), Some(512)),
        "maxvit_small_tf" => ([96, 192, 384, 768], SMALL, json!(64), Some(768)),
        "maxvit_base_tf" => ([96, 192, 384, 768], DEEP, json!(64), Some(768)),
        "maxvit_large_tf" => ([128, 256, 512, 1024], DEEP, json!(128), Some(1024)),
        "maxvit_xlarge_tf" => ([192, 384, 768, 1536], DEEP, json!(192), Some(1536)),
        "maxvit_pico_rw" | "maxvit_rmlp_pico_rw" => {
            ([32, 64, 128, 256], SMALL, json!([24, 32]), None)
        }
        "maxvit_nano_rw" | "maxvit_rmlp_nano_rw" => {
            ([64, 128, 256, 512], [1, 2, 3, 1], json!([32, 64]), None)
        }
        "maxvit_tiny_rw" | "maxvit_rmlp_tiny_rw" | "maxvit_tiny_pm" => {
            ([64, 128, 256, 512], SMALL, json!([32, 64]), None)
        }
        "maxvit_rmlp_small_rw" => ([96, 192, 384, 768], SMALL, json!([32, 64]), None),
        "maxvit_rmlp_base_rw" => ([96, 192, 384, 768], DEEP, json!([32, 64]), Some(768)),
        _ => {
            return Err(ModelError::Unsupported {
                what: "timm architecture",
                name: arch.to_string(),
            })
        }
    };
    let tf = variant.ends_with("_tf");
    let block = if variant.ends_with("_pm") { "PM" } else { "M" };
    let base = json!({
        "embed_dim": dims, "depths": depths, "block_type": vec![block; 4], "stem_width": stem,
        "stem_bias": tf, "head_hidden_size": head, "img_size": res.parse::<usize>().unwrap_or(224),
        "in_chans": 3, "num_classes": 1000, "global_pool": "avg",
    });
    let (conv, transformer) = if tf {
        let conv = json!({"norm_eps": 1e-3, "act_layer": "gelu_tanh", "padding": "same"});
        let transformer = json!({
            "norm_eps": 1e-5, "act_layer": "gelu_tanh", "head_first": false, "rel_pos_type": "bias_tf",
        });
        (conv, transformer)
    } else {
        let conv = json!({
            "expand_output": false, "output_bias": false, "attn_ratio": 1.0 / 16.0, "act_layer": "silu",
        });
        let rel_pos = if variant.contains("_rmlp_") {
            "mlp"
        } else {
            "bias"
        };
        let mut transformer = json!({ "rel_pos_type": rel_pos });
        if variant == "maxvit_rmlp_small_rw" {
            transformer["init_values"] = json!(1e-6);
        }
        (conv, transformer)
    };
    let obj = |v: Value| v.as_object().cloned().unwrap_or_default();
    Ok([obj(base), obj(conv), obj(transformer)])
}

fn from_map<T: DeserializeOwned>(m: Map<String, Value>, what: &str) -> Result<T> {
    serde_json::from_value(Value::Object(m)).map_err(|e| config_err(what, e.to_string()))
}

/// The three configs in timm's overlay order: preset, `pretrained_cfg` (input size, classes), the
/// top-level `num_classes` / `global_pool`, then `model_args`; checked against what is implemented.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1427 (_overlay_kwargs)
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_builder.py#L345 (_update_default_model_kwargs)
pub(super) fn resolve(arch: &str, cfg: &Value) -> Result<Config> {
    let [mut base, mut conv, mut transformer] = preset(arch)?;
    if let Some(p) = cfg.get("pretrained_cfg") {
        let input_size = p
            .get("input_size")
            .cloned()
            .map(serde_json::from_value::<[usize; 3]>);
        if let Some(Ok([c, h, w])) = input_size {
            base.insert("in_chans".into(), c.into());
            if p.get("fixed_input_size") == Some(&Value::Bool(true)) {
                base.insert("img_size".into(), json!([h, w]));
            }
        }
        if let Some(n) = p.get("num_classes").filter(|n| n.as_u64().is_some()) {
            base.insert("num_classes".into(), n.clone());
        }
    }
    for k in ["num_classes", "global_pool"] {
        if let Some(v) = cfg.get(k) {
            base.insert(k.into(), v.clone());
        }
    }
    if let Some(Value::Object(extra)) = cfg.get("model_args") {
        for (k, v) in extra {
            let (map, key) = if let Some(k) = k.strip_prefix("transformer_") {
                (&mut transformer, k)
            } else if let Some(k) = k.strip_prefix("conv_") {
                (&mut conv, k)
            } else {
                (&mut base, k.as_str())
            };
            map.insert(key.into(), v.clone());
        }
    }
    let a: Args = from_map(base, "model_args")?;
    let c: ConvCfg = from_map(conv, "model_args (conv_*)")?;
    let t: TransformerCfg = from_map(transformer, "model_args (transformer_*)")?;
    let acts = validate(&a, &c, &t)?;
    let (window, grid) = t.partitions(a.img_size.get())?;
    Ok(Config {
        a,
        c,
        t,
        acts,
        window,
        grid,
    })
}

/// timm `make_divisible`: the nearest multiple of `divisor`, bumped up when below `round_limit * v`.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/helpers.py#L55
pub(super) fn make_divisible(v: f64, divisor: usize, round_limit: f64) -> usize {
    let new_v = divisor.max((v + divisor as f64 / 2.0) as usize / divisor * divisor);
    if (new_v as f64) < round_limit * v {
        new_v + divisor
    } else {
        new_v
    }
}

/// timm activation names (`get_act_layer`).
fn activation(option: &str, name: &str) -> Result<Activation> {
    Ok(match name {
        "gelu" => Activation::Gelu,
        "gelu_tanh" => Activation::GeluTanh,
        "silu" | "swish" => Activation::Silu,
        "relu" => Activation::Relu,
        other => return Err(unsupported(option, format!("{other:?}"))),
    })
}

/// Refuses every option visenc does not implement, naming it; accepts silently only keys that do
/// not change inference.
fn validate(a: &Args, c: &ConvCfg, t: &TransformerCfg) -> Result<Activations> {
    let harmless: [(&str, &Map<String, Value>, &[&str]); 3] = [
        (
            "",
            &a.other,
            &["drop_rate", "drop_path_rate", "weight_init"],
        ),
        // ConvNeXt-block and pooled-stride fields, unused by MBConv with stride_mode 'dw'.
        (
            "conv_",
            &c.other,
            &["downsample_pool_type", "init_values", "norm_layer_cl"],
        ),
        // Fields of CoAtNet's TransformerBlock2d, of the MLP relative position, and of training.
        (
            "transformer_",
            &t.other,
            &[
                "expand_first",
                "shortcut_bias",
                "pool_type",
                "rel_pos_dim",
                "attn_drop",
                "proj_drop",
            ],
        ),
    ];
    for (prefix, other, keys) in harmless {
        if let Some((k, v)) = other.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
            return Err(unsupported(&format!("{prefix}{k}"), v));
        }
    }
    if a.embed_dim.len() != a.depths.len()
        || a.embed_dim.is_empty()
        || a.block_type.len() < a.depths.len()
    {
        let reason = "embed_dim, depths and block_type need one entry per stage";
        return Err(config_err("embed_dim", reason));
    }
    for b in &a.block_type {
        if !(b == "M" || b.as_array().is_some_and(|v| v.iter().all(|t| t == "M"))) {
            return Err(unsupported("block_type", b));
        }
    }
    let choices: [(&str, &str, &[&str]); 10] = [
        ("global_pool", &a.global_pool, &["avg"]),
        ("conv_block_type", &c.block_type, &["mbconv"]),
        ("conv_stride_mode", &c.stride_mode, &["dw"]),
        ("conv_pool_type", &c.pool_type, &["avg2"]),
        ("conv_padding", &c.padding, &["", "same"]),
        ("conv_attn_layer", &c.attn_layer, &["se"]),
        ("conv_norm_layer", &c.norm_layer, &["", "batchnorm2d"]),
        (
            "transformer_rel_pos_type",
            &t.rel_pos_type,
            &["bias", "bias_tf"],
        ),
        ("transformer_norm_layer", &t.norm_layer, &["layernorm2d"]),
        (
            "transformer_norm_layer_cl",
            &t.norm_layer_cl,
            &["layernorm"],
        ),
    ];
    for (option, value, allowed) in choices {
        if !allowed.contains(&value) {
            return Err(unsupported(option, format!("{value:?}")));
        }
    }
    let flags = [
        ("conv_pre_norm_act", c.pre_norm_act),
        ("conv_attn_early", c.attn_early),
        ("transformer_use_nchw_attn", t.use_nchw_attn),
    ];
    if let Some((option, _)) = flags.iter().find(|(_, on)| *on) {
        return Err(unsupported(option, true));
    }
    Ok(Activations {
        conv: activation("conv_act_layer", &c.act_layer)?,
        se: activation("conv_attn_act_layer", &c.attn_act_layer)?,
        mlp: activation("transformer_act_layer", &t.act_layer)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_timm() {
        // make_divisible(32) == 32, (20) == 24, (12) == 16, (4.0, round_limit 0) == 8.
        assert_eq!(make_divisible(32.0, 8, 0.9), 32);
        assert_eq!(make_divisible(20.0, 8, 0.9), 24);
        assert_eq!(make_divisible(12.0, 8, 0.9), 16);
        assert_eq!(make_divisible(4.0, 8, 0.0), 8);
    }

    #[test]
    fn presets_follow_the_name() {
        let cfg = json!({});
        let m = resolve("maxvit_base_tf_384", &cfg).unwrap();
        assert_eq!(
            (m.a.embed_dim[3], m.a.depths[2], m.a.head_hidden_size),
            (768, 14, Some(768))
        );
        assert_eq!(
            (m.a.img_size.get(), m.c.same(), m.t.head_first),
            ((384, 384), true, false)
        );
        assert_eq!((m.window, m.grid), ((12, 12), (12, 12)));
        let m = resolve("maxvit_nano_rw_256", &cfg).unwrap();
        assert_eq!(
            (
                m.a.stem_width.get(),
                m.a.head_hidden_size,
                m.c.expand_output
            ),
            ((32, 64), None, false)
        );
        assert_eq!(
            (m.t.rel_pos_type.as_str(), m.t.head_first, m.window),
            ("bias", true, (8, 8))
        );
        for (arch, option) in [
            ("maxvit_rmlp_tiny_rw_256", "transformer_rel_pos_type"),
            ("maxvit_tiny_pm_256", "block_type"),
        ] {
            match resolve(arch, &cfg) {
                Err(ModelError::Unsupported { name, .. }) => {
                    assert!(name.starts_with(option), "{name}")
                }
                other => panic!("{arch}: {:?}", other.map(|_| ())),
            }
        }
    }
}
