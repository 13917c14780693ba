{
  "targets": [
    {
      "target_name": "pkcs11_kdf",
      "sources": ["src/kdf.cc"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "<!(node -p \"require('path').join(require('path').dirname(require.resolve('pkcs11js/package.json')), 'includes')\")"
      ],
      "defines": ["NAPI_DISABLE_CPP_EXCEPTIONS", "NAPI_VERSION=8"],
      "cflags": [
        "-Wall", "-Wextra", "-Werror",
        "-fstack-protector-strong",
        "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2",
        "-fPIC"
      ],
      "cflags_cc": ["-Wall", "-Wextra", "-Werror"],
      "libraries": ["-ldl"],
      "ldflags": ["-Wl,-z,relro", "-Wl,-z,now"],
      "configurations": {
        "Release": {
          "cflags!": ["-O3"],
          "cflags": ["-O2"]
        },
        "Debug": {
          "cflags!": ["-O0"],
          "cflags": ["-O2"]
        }
      }
    }
  ]
}
