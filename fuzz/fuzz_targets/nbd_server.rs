#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| libcbt::fuzzing::nbd_server(data));
