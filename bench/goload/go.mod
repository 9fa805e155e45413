module connectproxy.bench/goload

go 1.19
