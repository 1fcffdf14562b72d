use super::*;

/// Records one skip into `log`, collecting its `LEAK-SKIP` line in `out`.
fn record(
    out: &mut Vec<u8>,
    log: &Path,
    test: &str,
    reason: &str,
    kind: SkipKind,
    ci: bool,
) -> Result<(), String> {
    record_skip(out, test, reason, kind, Some(log), ci)
}

#[test]
fn a_skip_is_one_line_of_the_log_and_fails_under_ci_only_when_it_hides_a_feature() {
    let dir = TempDir::new("leak-harness-skip-log").expect("temp dir");
    let log = dir.path().join("skips");
    let mut out = Vec::new();
    let reason = "promtool\tis missing\n(twice)";
    assert_eq!(
        record(
            &mut out,
            &log,
            "a::test",
            reason,
            SkipKind::Legitimate,
            true
        ),
        Ok(())
    );
    let failure = record(&mut out, &log, "b", "no root", SkipKind::HidesFeature, true)
        .expect_err("a hides-feature skip fails under CI");
    assert!(failure.contains("no root"), "{failure}");
    assert_eq!(
        record(&mut out, &log, "c", "no BTF", SkipKind::HidesFeature, false),
        Ok(())
    );
    assert_eq!(
        fs::read_to_string(&log).expect("the log"),
        "a::test\tlegitimate\tpromtool is missing (twice)\n\
         b\thides-feature\tno root\n\
         c\thides-feature\tno BTF\n"
    );
    assert_eq!(
        String::from_utf8(out.clone()).expect("UTF-8"),
        "LEAK-SKIP a::test: promtool is missing (twice)\n\
         LEAK-SKIP b: no root\n\
         LEAK-SKIP c: no BTF\n"
    );
    let unwritable = dir.path().join("no/such/dir");
    assert!(
        record(&mut out, &unwritable, "d", "x", SkipKind::Legitimate, false).is_err(),
        "a skip that cannot be recorded must fail the test"
    );
}

#[test]
fn the_current_test_is_named_as_libtest_names_it() {
    assert_eq!(
        current_test(),
        "experiment::harness::tests::the_current_test_is_named_as_libtest_names_it"
    );
}
