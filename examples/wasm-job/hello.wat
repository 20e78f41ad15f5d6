;; A WASI preview 1 command: prints its first argument and $GREETING, writes
;; a line to out.txt in its first preopened directory (the service's storage),
;; and exits with 0.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "out.txt")
  (data (i32.const 96) "written by wasm\n")
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $n))
  (func $print (param $fd i32) (param $p i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $p))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start") (local $arg i32) (local $env i32)
    ;; argv[1] and the first environment entry, each followed by a space or newline
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (local.set $arg (i32.load (i32.const 1028)))
    (call $print (i32.const 1) (local.get $arg) (call $strlen (local.get $arg)))
    (i32.store8 (i32.const 32) (i32.const 32))
    (call $print (i32.const 1) (i32.const 32) (i32.const 1))
    (drop (call $environ_get (i32.const 8192) (i32.const 12288)))
    (local.set $env (i32.load (i32.const 8192)))
    (call $print (i32.const 1) (local.get $env) (call $strlen (local.get $env)))
    (i32.store8 (i32.const 32) (i32.const 10))
    (call $print (i32.const 1) (i32.const 32) (i32.const 1))
    ;; out.txt in the preopened directory (fd 3), created or truncated
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 7)
          (i32.const 9) (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0)
          (i32.const 128))
      (then (call $proc_exit (i32.const 1))))
    (call $print (i32.load (i32.const 128)) (i32.const 96) (i32.const 16))
    (call $proc_exit (i32.const 0))))
