pub mod bench;
pub mod common;
pub mod doctor;
pub mod generate;
pub mod score;
pub mod train;
