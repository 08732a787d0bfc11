fn main() {
    let code = envoy_sidecar::cmd::wrapper::main(std::env::args_os().collect());
    // A delete's conntrack flush ran beside `runc delete`: let it finish.
    envoy_sidecar::nat::settle();
    std::process::exit(code);
}
