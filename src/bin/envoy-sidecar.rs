fn main() {
    let code = envoy_sidecar::cmd::cli::main(std::env::args().collect());
    // gc's, a hook's or the supervisor's last conntrack flush: let it finish.
    envoy_sidecar::nat::settle();
    std::process::exit(code);
}
