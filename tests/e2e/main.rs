#[test]
fn skip() {}
