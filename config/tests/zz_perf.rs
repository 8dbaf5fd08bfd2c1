#[test]
fn perf() {
    let mut s = String::from("version: 1\nroutes:\n");
    for i in 0..5000 {
        s.push_str(&format!(
            "  - {{ name: r{i}, pool: p, match: {{ args: {{ 1: \"^x{i}$\" }} }} }}\n"
        ));
    }
    s.push_str("  - { name: bad, pool: p, mdoe: raw }\npools: [{ name: p, backends: [{ address: \"10.0.0.1:1\" }] }]\n");
    let t = std::time::Instant::now();
    let e = agiproxy_config::from_yaml_str(&s).unwrap_err();
    println!("structural error: {:?} -> {e}", t.elapsed());
    let ok = s.replace("mdoe", "mode");
    let t = std::time::Instant::now();
    let c = agiproxy_config::from_yaml_str(&ok).unwrap();
    println!("valid: {:?}, {} routes", t.elapsed(), c.routes.len());
}
