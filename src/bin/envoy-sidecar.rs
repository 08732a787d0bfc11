fn main() {
    std::process::exit(envoy_sidecar::cmd::cli::main(std::env::args().collect()));
}
