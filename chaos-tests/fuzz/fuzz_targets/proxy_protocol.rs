#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| agiproxy_fuzz::proxy_protocol(data));
