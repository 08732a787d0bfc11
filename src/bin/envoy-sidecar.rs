fn main() {
    std::process::exit(envoy_sidecar::cli::main(std::env::args().collect()));
}
