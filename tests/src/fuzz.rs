//! How the property tests of the decoders run: a modest number of cases in
//! the default test run, many more in the ignored `stress_*` variants.

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Cases of each property in the default test run.
pub const DEFAULT_CASES: u32 = 256;

/// Cases of each property in a stress run: `SURF_FUZZ_CASES`, or 20 000.
pub fn stress_cases() -> u32 {
    std::env::var("SURF_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(20_000)
}

/// Checks `property` on `cases` values of `strategy`, panicking with the
/// smallest failing value it shrank to.
pub fn check<S: Strategy>(
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config::with_cases(cases));
    if let Err(failure) = runner.run(&strategy, property) {
        panic!("{failure}");
    }
}
