use smelt_models::*;
#[test]
fn time_full() {
    let tmp = tempfile::tempdir().unwrap();
    let c = testing::qwen2_5_0_5b_config();
    let t = std::time::Instant::now();
    testing::write_random_checkpoint(tmp.path(), &c, smelt_engine::DType::BF16, 1).unwrap();
    println!("write {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let w = Weights::load(tmp.path(), &Config::from_file(tmp.path().join("config.json")).unwrap(), &LoadOptions::default()).unwrap();
    println!("load f32 {:?} {}", t.elapsed(), w.num_parameters());
    let t = std::time::Instant::now();
    w.save(tmp.path().join("out.safetensors")).unwrap();
    println!("save f32 {:?}", t.elapsed());
}
