use smelt_models::*;
use smelt_engine::*;
#[test]
fn time_parts() {
    let t = std::time::Instant::now();
    let x = Tensor::zeros(&[500_000_000], DType::F32, Device::Cpu).unwrap();
    println!("zeros 2GB {:?}", t.elapsed());
    let t = std::time::Instant::now();
    { let mut w = x.cpu_write::<f32>().unwrap(); for (i, v) in w.iter_mut().enumerate() { *v = i as f32; } }
    println!("write 2GB {:?}", t.elapsed());
    drop(x);
    let tmp = tempfile::tempdir().unwrap();
    let c = testing::qwen2_5_0_5b_config();
    testing::write_random_checkpoint(tmp.path(), &c, DType::BF16, 1).unwrap();
    let t = std::time::Instant::now();
    let f = safetensors::SafetensorsFile::open(tmp.path().join("model.safetensors")).unwrap();
    let mut s = 0u64; for ti in f.tensors() { for b in f.bytes(ti).chunks(4096) { s += b[0] as u64; } }
    println!("fault mmap 1GB {:?} {s}", t.elapsed());
    let t = std::time::Instant::now();
    let w = Weights::load(tmp.path(), &Config::from_file(tmp.path().join("config.json")).unwrap(), &LoadOptions::default()).unwrap();
    println!("load f32 {:?} {}", t.elapsed(), w.num_parameters());
}
