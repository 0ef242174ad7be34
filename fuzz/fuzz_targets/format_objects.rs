#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| libcbt::fuzzing::format_objects(data));
