//! CUDA-graph decoding (`smelt_models::DecodeGraphs`, switched on process-wide by
//! `set_cuda_graphs`, hence a test binary of its own) against eager decoding. Skips without a
//! GPU or the emulator.
#![cfg(feature = "cuda")]

use smelt_engine::{DType, Device};
use smelt_kernels::sample::SamplingConfig;
use smelt_models::testing::fixture;
use smelt_models::{
    generate, generate_pruned, set_cuda_graphs, Config, DecodeGraphs, GenerateOptions, Generation, LoadOptions, Qwen,
    Weights,
};

/// `set_cuda_graphs` is process-wide, and these tests run in parallel: they take turns.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

fn load_on(name: &str, dtype: DType, device: Device) -> Qwen {
    let dir = fixture(name);
    let config = Config::from_file(dir.join("config.json")).expect("config");
    let opts = LoadOptions { dtype, device, ..LoadOptions::default() };
    Qwen::new(config.clone(), Weights::load(&dir, &config, &opts).expect("weights"))
}

/// Sampled generation with sequences stopping at different steps (the batch shrinks, so
/// smaller graphs are captured and padded rows decode into stopped sequences' slots): the
/// graph path gives the eager path's tokens, log-probs and entropies, and it did replay.
#[test]
fn device_graph_decoding_matches_eager() {
    let _turn = one_at_a_time();
    let Some(dev) = smelt_kernels::testing::test_cuda_device() else { return };
    for name in ["qwen2-tiny", "qwen3-tiny"] {
        for dtype in [DType::F32, DType::BF16] {
            let model = load_on(name, dtype, dev);
            let prompts = vec![vec![5u32, 77, 300, 12, 9], vec![42u32, 7], vec![3u32; 40]];
            let mut opts = GenerateOptions {
                max_new_tokens: 14,
                sampling: SamplingConfig { temperature: 0.9, top_k: Some(50), top_p: 0.95 },
                n_samples: 3,
                seed: 11,
                ..Default::default()
            };
            set_cuda_graphs(false);
            let free = generate(&model, &prompts, &opts).unwrap();
            // Stop on tokens the free run drew at different steps, so sequences leave the batch
            // one by one.
            opts.stop_ids = vec![free[0].ids[2], free[4].ids[5], free[7].ids[9]];
            let eager = generate(&model, &prompts, &opts).unwrap();
            assert!(eager.iter().filter(|g| g.stopped).count() >= 3, "{name} {dtype}: too few stopped");
            set_cuda_graphs(true);
            let before = DecodeGraphs::replays();
            let graphs = generate(&model, &prompts, &opts).unwrap();
            set_cuda_graphs(false);
            // Every decode step but the first (eager) replayed a graph: none fell back.
            let longest = graphs.iter().map(|g| g.ids.len()).max().unwrap_or(0) as u64;
            assert_eq!(DecodeGraphs::replays() - before, longest - 2, "{name} {dtype}: graph replays");
            // The graphs run their GEMMs on padded batches, and cuBLAS may pick another
            // algorithm for another row count: on a GPU that can move a logit by an ulp (of
            // bf16, or of f32), enough to flip a sampled token now and then. There each sequence
            // is compared up to its first differing token, and most tokens must agree; on the
            // emulator, whose matmul does not depend on the row count, everything must.
            let exact = smelt_engine::cuda::device(0).is_ok_and(|d| d.is_emulated());
            let (mut compared, mut total) = (0, 0);
            for (e, g) in eager.iter().zip(&graphs) {
                let what = format!("{name} {dtype} prompt {} sample {}", e.prompt, e.sample);
                let same = e.ids.iter().zip(&g.ids).take_while(|(a, b)| a == b).count();
                if exact {
                    assert_eq!((&g.ids, g.stopped), (&e.ids, e.stopped), "{what}: tokens");
                }
                // Through the first differing token, whose distribution is the same.
                let upto = (same + 1).min(e.ids.len()).min(g.ids.len());
                let (lp, ent) = (g.logp[..upto].iter().zip(&e.logp), g.entropy[..upto].iter().zip(&e.entropy));
                let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
                for (a, b) in lp.chain(ent) {
                    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
                }
                compared += same;
                total += e.ids.len();
            }
            let need = if dtype == DType::F32 { 0.9 } else { 0.5 };
            assert!(compared as f64 >= need * total as f64, "{name} {dtype}: only {compared} of {total} tokens agree");
            // Pruning (early rejection) moves the survivors into a cache of their own, where
            // slots and random streams part ways, and the graphs start again on it: the kept
            // sequences are still the unpruned run's. Three survivors make a graph of 3 rows,
            // whose sampling step sits at a 4-byte offset among its u32 inputs.
            if exact {
                let mut keep = |_: &[Generation]| vec![1, 4, 8];
                set_cuda_graphs(true);
                let before = DecodeGraphs::replays();
                let (pruned, _, kept) = generate_pruned(&model, &prompts, &opts, 0, 4, &mut keep).unwrap();
                set_cuda_graphs(false);
                assert!(DecodeGraphs::replays() - before > 4, "{name} {dtype}: no replays after the pruning");
                for i in kept {
                    let what = format!("{name} {dtype} kept sequence {i}");
                    assert_eq!((&pruned[i].ids, &pruned[i].logp), (&eager[i].ids, &eager[i].logp), "{what}");
                }
            }
        }
    }
}

/// What a graph cannot hold fails at capture, and the device is usable afterwards.
#[test]
fn device_capture_refuses_host_copies() {
    let _turn = one_at_a_time();
    let Some(Device::Cuda(ord)) = smelt_kernels::testing::test_cuda_device() else { return };
    let dev = smelt_engine::cuda::device(ord).unwrap();
    let t = smelt_engine::Tensor::zeros(&[4], DType::F32, Device::Cuda(ord)).unwrap();
    let e = dev.capture(|| t.to_vec::<f32>()).err().expect("a device→host copy in a capture must fail");
    assert!(e.to_string().contains("cannot be captured"), "{e}");
    assert!(!dev.is_capturing());
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![0.0; 4]);
}

/// A block freed during a capture stays the graph's (its nodes use the address) until the graph
/// is dropped; a replay repeats the captured work.
#[test]
fn device_capture_holds_freed_blocks_and_replays() {
    let _turn = one_at_a_time();
    let Some(device) = smelt_kernels::testing::test_cuda_device() else { return };
    let Device::Cuda(ord) = device else { return };
    let dev = smelt_engine::cuda::device(ord).unwrap();
    let full = |v: f64| smelt_engine::Tensor::full(v, &[1000], DType::F32, device).unwrap();
    let (out, one) = (full(5.0), full(1.0));
    let (graph, freed) = dev
        .capture(|| {
            // out += 1 + 0, through a temporary freed before the capture ends.
            let tmp = smelt_engine::Tensor::zeros(&[1000], DType::F32, device)?;
            smelt_kernels::add::add_scaled_(&tmp, 1.0, &one)?;
            smelt_kernels::add::add_scaled_(&out, 1.0, &tmp)?;
            tmp.cuda_ptr()
        })
        .unwrap();
    let after = smelt_engine::Tensor::empty(&[1000], DType::F32, device).unwrap();
    assert_ne!(after.cuda_ptr().unwrap(), freed, "a block the graph uses was handed out again");
    assert_eq!(out.to_vec::<f32>().unwrap()[0], 5.0, "captured work must not run before a launch");
    graph.launch().unwrap();
    graph.launch().unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![7.0; 1000]);
    drop((graph, after));
}

/// The graphs hold the addresses of the cache and weights they were captured with: a call with
/// another cache is refused (the first call may capture: nothing needs an eager step first).
#[test]
fn device_decode_graphs_stay_with_their_cache() {
    let _turn = one_at_a_time();
    let Some(dev) = smelt_kernels::testing::test_cuda_device() else { return };
    let model = load_on("qwen2-tiny", DType::F32, dev);
    let mut graphs = DecodeGraphs::new(&SamplingConfig::default(), 3);
    let (mut a, mut b) = (model.new_kv_cache(2, 16).unwrap(), model.new_kv_cache(2, 16).unwrap());
    let first = graphs.decode_sample(&model, &mut a, &[0, 1], &[0, 1], &[5, 6], &[], 0).unwrap();
    let e = graphs.decode_sample(&model, &mut b, &[0, 1], &[0, 1], &[5, 6], &[], 0).expect_err("another cache");
    assert!(e.to_string().contains("another KV cache"), "{e}");
    // The same inputs on the same cache state give the same draws.
    a.lens = vec![0, 0];
    assert_eq!(graphs.decode_sample(&model, &mut a, &[0, 1], &[0, 1], &[5, 6], &[], 0).unwrap(), first);
    assert_eq!(graphs.captured(), 1);
}
