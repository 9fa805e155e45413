module connectproxy.bench/goref

go 1.19
