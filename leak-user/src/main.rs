fn main() {
    let bytes = include_bytes!(concat!(env!("OUT_DIR"), "/leak"));
    println!("{}", bytes.len());
}
