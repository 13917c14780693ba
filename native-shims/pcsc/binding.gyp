{
  "targets": [
    {
      "target_name": "pcsc_lite",
      "sources": ["src/pcsc.cc"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "/usr/include/PCSC"
      ],
      "defines": ["NAPI_CPP_EXCEPTIONS", "NAPI_VERSION=8"],
      "cflags": [
        "-Wall", "-Wextra", "-Werror",
        "-fstack-protector-strong",
        "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2",
        "-fPIC"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-Wall", "-Wextra", "-Werror", "-fexceptions", "-std=c++17"],
      "libraries": ["-lpcsclite"],
      "ldflags": ["-pthread", "-Wl,-z,relro", "-Wl,-z,now"],
      "configurations": {
        "Release": { "cflags!": ["-O3"], "cflags": ["-O2"] },
        "Debug": { "cflags!": ["-O0"], "cflags": ["-O2"] }
      }
    }
  ]
}
