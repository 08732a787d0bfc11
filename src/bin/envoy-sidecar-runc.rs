fn main() {
    std::process::exit(envoy_sidecar::wrapper::main(std::env::args_os().collect()));
}
