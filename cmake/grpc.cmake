# gRPC/protobuf for every folder that speaks gRPC (cri/, etcd/): Debian's
# libgrpc++-dev, protobuf-compiler, protobuf-compiler-grpc.
#
#   shimlet_grpc_library(NAME lib PROTO_ROOT dir PROTOS a.proto b.proto [SERVICES])
#
# runs protoc at build time on PROTO_ROOT/<each proto> (paths relative to
# PROTO_ROOT, which is also the import root) into the build tree, with
# grpc_cpp_plugin too when SERVICES is given, and makes a static library NAME
# of the generated code that links protobuf (and gRPC++ with SERVICES) and
# exports the generated headers' include directory ("etcdserverpb/rpc.grpc.pb.h",
# "cri/streaming.pb.h" style includes).
#
#   shimlet_shared_cxx(target)
#
# for every executable that links such a library. gRPC and protobuf are linked
# shared, in every build (their static archives need every abseil, re2, c-ares
# and upb archive listed by hand), and bring the shared C++ runtime: the target
# gets the property SHIMLET_SHARED_CXX (no -static-libstdc++, root
# CMakeLists.txt: one C++ runtime per process) and -Wl,--exclude-libs,ALL (our
# statically linked OpenSSL stays ours: gRPC's shared libraries keep binding to
# the shared OpenSSL they were built with).
include_guard(GLOBAL)
find_program(SHIMLET_PROTOC protoc REQUIRED)
find_program(SHIMLET_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
set(_shimlet_suffixes ${CMAKE_FIND_LIBRARY_SUFFIXES})
set(CMAKE_FIND_LIBRARY_SUFFIXES .so .a)  # shared (see above), whatever SHIMLET_STATIC_DEPS chose
pkg_check_modules(GRPCPP REQUIRED IMPORTED_TARGET GLOBAL grpc++)
pkg_check_modules(PROTOBUF REQUIRED IMPORTED_TARGET GLOBAL protobuf)
set(CMAKE_FIND_LIBRARY_SUFFIXES ${_shimlet_suffixes})

function(shimlet_grpc_library)
  cmake_parse_arguments(G "SERVICES" "NAME;PROTO_ROOT" "PROTOS" ${ARGN})
  set(out ${CMAKE_CURRENT_BINARY_DIR}/${G_NAME}_gen)
  file(MAKE_DIRECTORY ${out})
  set(srcs)
  foreach(p ${G_PROTOS})
    string(REGEX REPLACE "\\.proto$" "" base ${p})
    set(gen ${out}/${base}.pb.cc ${out}/${base}.pb.h)
    set(args --cpp_out=${out})
    set(deps ${G_PROTO_ROOT}/${p} ${SHIMLET_PROTOC})
    if(G_SERVICES)
      list(APPEND gen ${out}/${base}.grpc.pb.cc ${out}/${base}.grpc.pb.h)
      list(APPEND args --grpc_out=${out} --plugin=protoc-gen-grpc=${SHIMLET_GRPC_CPP_PLUGIN})
      list(APPEND deps ${SHIMLET_GRPC_CPP_PLUGIN})
    endif()
    add_custom_command(
      OUTPUT ${gen}
      COMMAND ${SHIMLET_PROTOC} --proto_path=${G_PROTO_ROOT} ${args} ${G_PROTO_ROOT}/${p}
      DEPENDS ${deps}
      COMMENT "protoc ${p}"
      VERBATIM)
    list(APPEND srcs ${gen})
  endforeach()
  add_library(${G_NAME} STATIC ${srcs})
  # Generated code is not ours to warn about.
  target_compile_options(${G_NAME} PRIVATE -w)
  target_include_directories(${G_NAME} SYSTEM PUBLIC ${out})
  target_link_libraries(${G_NAME} PUBLIC PkgConfig::PROTOBUF)
  if(G_SERVICES)
    target_link_libraries(${G_NAME} PUBLIC PkgConfig::GRPCPP)
  endif()
endfunction()

function(shimlet_shared_cxx target)
  target_link_options(${target} PRIVATE -Wl,--exclude-libs,ALL)
  set_target_properties(${target} PROPERTIES SHIMLET_SHARED_CXX ON)
endfunction()
