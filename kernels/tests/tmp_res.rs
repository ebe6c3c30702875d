#[test]
fn res() {
    let src = include_str!("../cuda/attention.cu");
    for arch in ["sm_80", "sm_90"] {
        for r in smelt_kernels::cuda::compile_resources("attention", src, arch).unwrap() {
            if r.kernel.contains("v3") || r.kernel.contains("bwd_dkdv_v2") || r.kernel.contains("bwd_dq_v2") {
                println!(
                    "{arch} {} regs {} smem {} spill {}/{}",
                    r.kernel, r.registers, r.smem, r.spill_stores, r.spill_loads
                );
            }
        }
    }
}
