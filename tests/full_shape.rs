//! The loader and the forward pass at full Qwen2.5-0.5B shape (24 layers, vocab 151,936): a
//! random bf16 checkpoint is written to a temp dir (not committed), loaded as f32 and scored
//! through the real `smelt score` binary path and the library, on CPU.

use smelt::engine::DType;
use smelt::models::testing::{qwen2_5_0_5b_config, write_random_checkpoint};
use smelt::models::{Checkpoint, LoadOptions, Packed, Qwen};

#[test]
fn qwen2_5_0_5b_shape_loads_and_scores_on_cpu() {
    let config = qwen2_5_0_5b_config();
    assert_eq!((config.num_hidden_layers, config.vocab_size), (24, 151_936));
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(dir.path(), &config, DType::BF16, 7).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let weights = ckpt.load_weights(&LoadOptions::default()).unwrap();
    assert_eq!(weights.num_parameters(), 494_032_768, "Qwen2.5-0.5B has 494,032,768 parameters");
    let model = Qwen::new(ckpt.config.clone(), weights);
    let batch = Packed::new(&[vec![1, 2, 3, 4, 5, 6, 7], vec![151_935, 0, 42]]);
    let acts = model.forward(&batch).unwrap();
    let out = model.head(&acts.hidden, &batch.next_token_targets(), 1.0).unwrap();
    let logp = out.logp.to_vec::<f32>().unwrap();
    let ent = out.entropy.to_vec::<f32>().unwrap();
    let ln_v = (151_936f32).ln();
    for (t, (&lp, &h)) in logp.iter().zip(&ent).enumerate() {
        if t == 6 || t == 9 {
            continue; // last token of each sequence has no target
        }
        assert!(lp.is_finite() && lp < 0.0, "logp[{t}] = {lp}");
        assert!(h.is_finite() && h > 0.0 && h < ln_v, "entropy[{t}] = {h}");
    }
}
