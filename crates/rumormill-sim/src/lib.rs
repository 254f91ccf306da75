//! placeholder
pub mod epidemic;
