//! Every error the DSL's macros and loss bounds report, pinned: each must point at the user's
//! tokens and say how to fix it (`tests/ui/*.stderr`).

#[test]
fn macro_and_loss_errors_are_pinned() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
