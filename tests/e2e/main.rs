#[test] fn skip(){}
