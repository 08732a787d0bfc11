fn main() {
    std::process::exit(envoy_sidecar::cmd::wrapper::main(
        std::env::args_os().collect(),
    ));
}
