//! Compiles every `kernels/cuda/*.cu` (with `common.cuh` prepended, as at run time) for sm_80
//! and sm_90 with NVRTC, and fails listing every error with NVRTC's log. Needs no GPU.
//!
//! libnvrtc is found through the loader path (`LD_LIBRARY_PATH`; `scripts/install-nvrtc`
//! prints a folder holding NVRTC 13.0). Without it the test prints why and passes, unless
//! `SMELT_REQUIRE_NVRTC=1`, where a missing NVRTC fails it (CI sets this).

#[cfg(feature = "cuda")]
#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    use smelt_kernels::cuda::{compile_source, nvrtc_status, ImageKind};

    let nvrtc = match nvrtc_status() {
        Ok(s) => s,
        Err(e) => return smelt_kernels::testing::skip_without_nvrtc("nvrtc_compile", e),
    };
    println!("nvrtc_compile: using {nvrtc}");

    let dir = smelt_kernels::testing::repo_path("kernels/cuda");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .cu files in {}", dir.display());

    // (name, code, arch) jobs, compiled on all cores: NVRTC is thread-safe across programs.
    let mut failures = vec![];
    let mut jobs = vec![];
    for path in &files {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        match std::fs::read_to_string(path) {
            Ok(code) => {
                if code.contains("#include") {
                    failures.push(format!("{name}.cu: contains #include (sources must include no headers)"));
                }
                for arch in ["sm_80", "sm_90"] {
                    jobs.push((name.clone(), code.clone(), arch));
                }
            }
            Err(e) => failures.push(format!("{}: cannot read: {e}", path.display())),
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; jobs.len()]);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(jobs.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((name, code, arch)) = jobs.get(i) else { break };
                let t0 = std::time::Instant::now();
                let r = compile_source(name, code, arch).map(|c| (c, t0.elapsed().as_millis()));
                results.lock().unwrap()[i] = Some(r.map_err(|e| e.to_string()));
            });
        }
    });
    let mut ok = 0;
    for ((name, _, arch), r) in jobs.iter().zip(results.into_inner().unwrap()) {
        match r {
            Some(Ok((c, ms))) => {
                assert_eq!(c.kind, ImageKind::Cubin);
                ok += 1;
                let warn = if c.log.is_empty() {
                    String::new()
                } else {
                    format!("\n    log: {}", c.log.replace('\n', "\n    "))
                };
                println!("  {name}.cu {arch}: ok ({} KiB cubin, {ms} ms){warn}", c.image.len().div_ceil(1024));
            }
            Some(Err(e)) => failures.push(e),
            None => failures.push(format!("{name}.cu {arch}: not compiled (worker died)")),
        }
    }
    println!("nvrtc_compile: {ok} of {} compiles succeeded", files.len() * 2);
    assert!(failures.is_empty(), "{} kernel compile(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    smelt_kernels::testing::skip_without_nvrtc("nvrtc_compile", "smelt-kernels was built without the `cuda` feature");
}
