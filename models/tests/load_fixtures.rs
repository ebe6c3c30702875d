//! The committed tiny Qwen2 / Qwen3 checkpoints load as transformers saved them.

use serde_json::Value;
use smelt_engine::{DType, Device};
use smelt_models::safetensors::SafetensorsFile;
use smelt_models::testing::write_random_checkpoint;
use smelt_models::{
    save_safetensors, stop_token_ids, Checkpoint, Config, LoadOptions, Message, ModelType, RenderOptions, Tokenizer,
    Weights,
};

use smelt_models::testing::fixture;

fn inputs(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference/inputs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sequence(inputs: &Value, name: &str) -> Value {
    inputs["sequences"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn qwen2_config_old_style() {
    let c = Config::from_file(fixture("qwen2-tiny/config.json")).unwrap();
    assert_eq!(c.model_type, ModelType::Qwen2);
    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (64, 160, 2));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (4, 2, 16));
    assert_eq!((c.vocab_size, c.max_position_embeddings), (400, 512));
    assert_eq!(c.rope_theta, 10_000.0);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_bias && !c.qk_norm);
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id), (Some(392), vec![394], Some(392)));
    assert_eq!(c.dtype, Some(DType::F32));
}

#[test]
fn qwen3_config_new_style() {
    let c = Config::from_file(fixture("qwen3-tiny/config.json")).unwrap();
    assert_eq!(c.model_type, ModelType::Qwen3);
    assert_eq!((c.hidden_size, c.intermediate_size), (64, 96));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (4, 2, 24));
    assert_eq!((c.q_dim(), c.kv_dim(), c.gqa_group()), (96, 48, 2));
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && c.qk_norm);
    assert_eq!(c.dtype, Some(DType::BF16));
}

#[test]
fn qwen2_weights_tied_with_bias() {
    let dir = fixture("qwen2-tiny");
    let c = Config::from_file(dir.join("config.json")).unwrap();
    let w = Weights::load(&dir, &c, &LoadOptions::default()).unwrap();
    assert!(w.lm_head.is_none());
    assert!(w.lm_head().same_storage(&w.embed_tokens));
    assert_eq!(w.embed_tokens.shape(), &[400, 64]);
    assert_eq!(w.layers.len(), 2);
    let l = &w.layers[1];
    assert_eq!(l.q_proj.shape(), &[64, 64]);
    assert_eq!(l.k_proj.shape(), &[32, 64]);
    assert_eq!(l.o_proj.shape(), &[64, 64]);
    assert_eq!(l.q_bias.as_ref().unwrap().shape(), &[64]);
    assert_eq!(l.v_bias.as_ref().unwrap().shape(), &[32]);
    assert!(l.o_bias.is_none() && l.q_norm.is_none());
    assert_eq!(l.gate_proj.shape(), &[160, 64]);
    assert_eq!(l.down_proj.shape(), &[64, 160]);
    assert_eq!(w.embed_tokens.dtype(), DType::F32);

    // Names, shapes and values match the file exactly (f32 → f32 is a copy).
    let file = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let named = w.named_tensors();
    assert_eq!(named.len(), file.tensors().len());
    let expected = c.expected_tensors();
    assert_eq!(named.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect::<Vec<_>>(), expected);
    for (name, t) in &named {
        let raw = file.load(name, None, true).unwrap();
        assert_eq!(raw.to_bytes().unwrap(), t.to_bytes().unwrap(), "{name}");
    }
    assert_eq!(w.num_parameters(), c.num_parameters());
}

#[test]
fn qwen3_weights_sharded_bf16_untied() {
    let dir = fixture("qwen3-tiny");
    let c = Config::from_file(dir.join("config.json")).unwrap();
    let bf = Weights::load(&dir, &c, &LoadOptions { dtype: DType::BF16, ..Default::default() }).unwrap();
    let f = Weights::load(&dir, &c, &LoadOptions::default()).unwrap();
    assert_eq!(bf.lm_head.as_ref().unwrap().shape(), &[400, 64]);
    assert_eq!(bf.embed_tokens.dtype(), DType::BF16);
    assert_eq!(f.embed_tokens.dtype(), DType::F32);
    let l = &f.layers[0];
    assert_eq!(l.q_proj.shape(), &[96, 64]);
    assert_eq!(l.k_proj.shape(), &[48, 64]);
    assert_eq!(l.o_proj.shape(), &[64, 96]);
    assert_eq!(l.q_norm.as_ref().unwrap().shape(), &[24]);
    assert_eq!(l.k_norm.as_ref().unwrap().shape(), &[24]);
    assert!(l.q_bias.is_none() && l.o_bias.is_none());
    // bf16 → f32 is exact; both shards contributed (layer 1 is split across them).
    for ((n, a), (_, b)) in bf.named_tensors().iter().zip(f.named_tensors()) {
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap(), "{n}");
        assert_eq!(a.dtype(), DType::BF16);
    }
    assert_eq!(bf.named_tensors().len(), 2 + 2 * 11 + 1);
}

#[test]
fn save_roundtrip_reads_back_in_reference_crate() {
    let dir = fixture("qwen3-tiny");
    let c = Config::from_file(dir.join("config.json")).unwrap();
    let w = Weights::load(&dir, &c, &LoadOptions { dtype: DType::BF16, ..Default::default() }).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    w.save(tmp.path().join("model.safetensors")).unwrap();
    // The reference implementation accepts our file and sees the same tensors.
    let bytes = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), w.named_tensors().len());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    for (name, t) in w.named_tensors() {
        let v = st.tensor(&name).unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::BF16);
        assert_eq!(v.shape(), t.shape());
        assert_eq!(v.data(), &t.to_bytes().unwrap()[..], "{name}");
    }
    // And our loader reloads it (single file now) to the same values.
    let again = Weights::load(tmp.path(), &c, &LoadOptions { dtype: DType::BF16, ..Default::default() }).unwrap();
    for ((n, a), (_, b)) in w.named_tensors().iter().zip(again.named_tensors()) {
        assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap(), "{n}");
    }
    // Overwriting is atomic (no temporary file left behind), and mixed dtypes are kept.
    let x = smelt_engine::Tensor::from_slice(&[1i32, 2, 3], &[3], Device::Cpu).unwrap();
    save_safetensors(tmp.path().join("model.safetensors"), &[("step", &x)]).unwrap();
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let f = SafetensorsFile::open(tmp.path().join("model.safetensors")).unwrap();
    assert_eq!(f.load("step", None, true).unwrap().to_vec::<i32>().unwrap(), vec![1, 2, 3]);
}

#[test]
fn weights_containers_zeros_map_from_named() {
    let c = Config::from_file(fixture("qwen2-tiny/config.json")).unwrap();
    let w = Weights::load(fixture("qwen2-tiny"), &c, &LoadOptions::default()).unwrap();
    let z = Weights::zeros(&c, DType::F32, Device::Cpu).unwrap();
    assert!(z.named_tensors().iter().all(|(_, t)| t.to_vec_f32().unwrap().iter().all(|&x| x == 0.0)));
    let doubled = w.try_map(|_, t| Ok(t.to_dtype(DType::BF16)?)).unwrap();
    assert!(doubled.named_tensors().iter().all(|(_, t)| t.dtype() == DType::BF16));
    let named: Vec<(String, _)> = w.named_tensors().into_iter().map(|(n, t)| (n, t.clone())).collect();
    let rebuilt = Weights::from_named(&c, named.clone()).unwrap();
    assert!(rebuilt.layers[1].down_proj.same_storage(&w.layers[1].down_proj));
    let e = Weights::from_named(&c, named[1..].to_vec()).unwrap_err().to_string();
    assert!(e.contains("missing: model.embed_tokens.weight"), "{e}");

    // zeros_flat: the same names and shapes as zeros, as disjoint views of one buffer, each
    // 256-byte aligned but k's and v's projection weights and biases, which follow q's: the
    // fused q/k/v projection's gradient is one view (and its bias gradient another).
    let (f, flat) = Weights::zeros_flat(&c, DType::F32, Device::Cpu).unwrap();
    let (fz, zz) = (f.named_tensors(), z.named_tensors());
    assert_eq!(
        fz.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect::<Vec<_>>(),
        zz.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect::<Vec<_>>()
    );
    let mut by_offset: Vec<_> = fz.iter().collect();
    by_offset.sort_by_key(|(_, t)| t.offset());
    let mut end = 0;
    for (n, t) in by_offset {
        assert!(t.same_storage(&flat), "{n}");
        let grouped = n.contains("k_proj.") || n.contains("v_proj.");
        assert!(t.offset() >= end && (grouped || t.offset() * 4 % 256 == 0), "{n} at element {}", t.offset());
        end = t.offset() + t.elem_count();
    }
    assert!(end <= flat.elem_count());
    for l in &f.layers {
        assert!(l.qkv().is_some(), "q/k/v weight gradients in one view");
        let biases = [&l.q_bias, &l.k_bias, &l.v_bias].map(|b| b.as_ref().unwrap());
        assert!(smelt_engine::Tensor::rows_view(&biases).is_some(), "q/k/v bias gradients in one view");
    }
    // Writing one view shows in the buffer at its offset and nowhere else.
    let (name, last) = fz.last().unwrap();
    last.copy_from(&smelt_engine::Tensor::full(2.0, last.shape(), DType::F32, Device::Cpu).unwrap()).unwrap();
    let all = flat.to_vec_f32().unwrap();
    assert_eq!(all.iter().filter(|&&x| x == 2.0).count(), last.elem_count(), "{name}");
    assert!(all[last.offset()..last.offset() + last.elem_count()].iter().all(|&x| x == 2.0));
}

#[test]
fn tokenizer_encode_decode_match_reference() {
    for m in ["qwen2-tiny", "qwen3-tiny"] {
        let inp = inputs(m);
        let tok = Tokenizer::from_file(fixture(m).join("tokenizer.json")).unwrap().with_model_vocab(400).unwrap();
        assert_eq!(tok.size(), inp["tokenizer_size"].as_u64().unwrap() as usize);
        let text = sequence(&inp, "text");
        let got = tok.encode(text["text"].as_str().unwrap(), false).unwrap();
        assert_eq!(got, ids(&text["ids"]), "{m}");
        assert_eq!(tok.decode(&got, false).unwrap(), text["text"].as_str().unwrap());
        for (t, id) in inp["special_token_ids"].as_object().unwrap() {
            assert_eq!(tok.token_id(t).unwrap(), id.as_u64().unwrap() as u32);
        }
        // Ids of padding rows (397..400) decode to nothing; beyond the vocab is an error.
        assert_eq!(tok.decode(&[397, 265, 399], false).unwrap(), tok.decode(&[265], false).unwrap());
        let e = tok.decode(&[265, 400], false).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("vocab_size"), "{e}");
        assert_eq!(tok.decode(&[394, 265], true).unwrap(), tok.decode(&[265], true).unwrap());
    }
}

#[test]
fn chat_template_matches_transformers() {
    for m in ["qwen2-tiny", "qwen3-tiny"] {
        let ck = Checkpoint::open(fixture(m)).unwrap();
        assert!(!ck.chat_template.is_fallback());
        let chat = sequence(&inputs(m), "chat");
        let msgs: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
        let text = ck.render_chat(&msgs, &opts).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap());
        assert_eq!(ck.tokenizer().unwrap().encode(&text, false).unwrap(), ids(&chat["ids"]));
    }
}

#[test]
fn generation_config_and_stop_ids() {
    let ck = Checkpoint::open(fixture("qwen2-tiny")).unwrap();
    assert_eq!(ck.generation_config.eos_token_ids, vec![394, 392]);
    assert_eq!(ck.generation_config.do_sample, Some(false));
    assert_eq!(ck.generation_config.temperature, None);
    assert_eq!(ck.tokenizer_config.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(ck.stop_token_ids().unwrap(), vec![394, 392]);
    let mut g = ck.generation_config.clone();
    g.eos_token_ids = vec![7];
    assert_eq!(stop_token_ids(&g, &ck.config, Some(394)), vec![7, 394]);
    let w = ck.load_weights(&LoadOptions::default()).unwrap();
    assert_eq!(w.layers.len(), 2);
}

#[test]
fn random_checkpoint_writes_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, base) in ["qwen2-tiny", "qwen3-tiny"].into_iter().enumerate() {
        let c = Config::from_file(fixture(base).join("config.json")).unwrap();
        let dir = tmp.path().join(base);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            write_random_checkpoint(&dir, &c, dtype, 7 + i as u64).unwrap();
            let c2 = Config::from_file(dir.join("config.json")).unwrap();
            assert_eq!(Config { dtype: c.dtype, ..c2.clone() }, c);
            let w = Weights::load(&dir, &c2, &LoadOptions::default()).unwrap();
            let norm = w.layers[0].input_layernorm.to_vec_f32().unwrap();
            assert!(norm.iter().all(|&x| (0.79..=1.21).contains(&x)));
            let q = w.layers[1].q_proj.to_vec_f32().unwrap();
            let std = (q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32).sqrt();
            assert!((std - 0.125).abs() < 0.02, "q_proj std {std}");
            let first = std::fs::read(dir.join("model.safetensors")).unwrap();
            write_random_checkpoint(&dir, &c, dtype, 7 + i as u64).unwrap();
            assert_eq!(first, std::fs::read(dir.join("model.safetensors")).unwrap(), "not deterministic");
        }
    }
    // The full-size configs are consistent with the released models' parameter counts.
    assert_eq!(smelt_models::testing::qwen2_5_0_5b_config().num_parameters(), 494_032_768);
    assert_eq!(smelt_models::testing::qwen3_0_6b_config().num_parameters(), 596_049_920);
}
