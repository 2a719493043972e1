# gRPC/protobuf code generation and linking (Debian's libgrpc++-dev,
# protobuf-compiler, protobuf-compiler-grpc), for every folder that speaks gRPC:
#
#   shimlet_grpc_library(NAME lib PROTO_ROOT dir PROTOS a.proto b.proto)
#
# runs protoc + grpc_cpp_plugin at build time on PROTO_ROOT/<each proto> (paths
# relative to PROTO_ROOT, which is also the import root) into the build tree,
# and makes a static library NAME of the generated code that links gRPC++ and
# protobuf and exports the generated headers' include directory (so
# "etcdserverpb/rpc.grpc.pb.h" style includes work).
#
# Linking: plain builds with SHIMLET_STATIC_DEPS link the static archives
# Debian ships (libgrpc++.a, libgrpc.a, absl, upb, re2, c-ares, protobuf):
# those binaries link OpenSSL statically, and a shared libgrpc would load a
# second, shared OpenSSL into the same process. Sanitizer/fuzz builds link the
# shared libraries, like every other dependency there.
include_guard(GLOBAL)
find_package(PkgConfig REQUIRED)
find_program(SHIMLET_PROTOC protoc REQUIRED)
find_program(SHIMLET_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
pkg_check_modules(SHIMLET_GRPCPP REQUIRED grpc++ protobuf)
find_package(Threads REQUIRED)

if(NOT TARGET shimlet_grpcpp)
  add_library(shimlet_grpcpp INTERFACE)
  target_include_directories(shimlet_grpcpp SYSTEM INTERFACE ${SHIMLET_GRPCPP_INCLUDE_DIRS})
  target_compile_options(shimlet_grpcpp INTERFACE ${SHIMLET_GRPCPP_CFLAGS_OTHER})
  if(SHIMLET_STATIC_DEPS AND NOT SHIMLET_SANITIZE AND NOT SHIMLET_FUZZ)
    set(_libs)
    foreach(l ${SHIMLET_GRPCPP_STATIC_LIBRARIES})
      if(l MATCHES "^(pthread|dl|rt|m|atomic)$")
        list(APPEND _libs ${l})  # the C runtime's own
        continue()
      endif()
      # The same archives as the rest of the build (FindOpenSSL/FindZLIB with
      # *_USE_STATIC_LIBS), named inside the group so that they follow libgrpc.a.
      if(l STREQUAL "ssl")
        list(APPEND _libs ${OPENSSL_SSL_LIBRARY})
        continue()
      endif()
      if(l STREQUAL "crypto")
        list(APPEND _libs ${OPENSSL_CRYPTO_LIBRARY})
        continue()
      endif()
      if(l STREQUAL "z")
        list(APPEND _libs ${ZLIB_LIBRARIES})
        continue()
      endif()
      find_library(_lib_${l} NAMES lib${l}.a HINTS ${SHIMLET_GRPCPP_STATIC_LIBRARY_DIRS})
      if(NOT _lib_${l})
        message(FATAL_ERROR "gRPC static linking: lib${l}.a not found")
      endif()
      list(APPEND _libs ${_lib_${l}})
    endforeach()
    # The archives reference each other in both directions (absl <-> grpc).
    target_link_libraries(shimlet_grpcpp INTERFACE -Wl,--start-group ${_libs} -Wl,--end-group Threads::Threads)
  else()
    target_link_libraries(shimlet_grpcpp INTERFACE ${SHIMLET_GRPCPP_LINK_LIBRARIES})
  endif()
endif()

function(shimlet_grpc_library)
  cmake_parse_arguments(G "" "NAME;PROTO_ROOT" "PROTOS" ${ARGN})
  set(out ${CMAKE_CURRENT_BINARY_DIR}/${G_NAME}_gen)
  file(MAKE_DIRECTORY ${out})
  set(srcs)
  foreach(p ${G_PROTOS})
    string(REGEX REPLACE "\\.proto$" "" base ${p})
    set(gen ${out}/${base}.pb.cc ${out}/${base}.pb.h ${out}/${base}.grpc.pb.cc ${out}/${base}.grpc.pb.h)
    add_custom_command(
      OUTPUT ${gen}
      COMMAND ${SHIMLET_PROTOC} --proto_path=${G_PROTO_ROOT} --cpp_out=${out} --grpc_out=${out}
              --plugin=protoc-gen-grpc=${SHIMLET_GRPC_CPP_PLUGIN} ${G_PROTO_ROOT}/${p}
      DEPENDS ${G_PROTO_ROOT}/${p} ${SHIMLET_PROTOC} ${SHIMLET_GRPC_CPP_PLUGIN}
      COMMENT "protoc ${p}"
      VERBATIM)
    list(APPEND srcs ${gen})
  endforeach()
  add_library(${G_NAME} STATIC ${srcs})
  # Generated code is not ours to warn about.
  target_compile_options(${G_NAME} PRIVATE -w)
  target_include_directories(${G_NAME} SYSTEM PUBLIC ${out})
  target_link_libraries(${G_NAME} PUBLIC shimlet_grpcpp)
endfunction()
