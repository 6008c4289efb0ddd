package ruxo.hapi;

import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.api.model.ExpungeOptions;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.api.server.SystemRequestDetails;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.persistence.EntityManager;
import jakarta.persistence.EntityManagerFactory;
import java.io.IOException;
import java.util.List;
import org.springframework.context.ApplicationContext;

/**
 * Test-only admin API beside the FHIR base: switches HAPI's own settings at run time and empties
 * the repository between tests. Every switch maps to a setting a HAPI deployment has.
 *
 * <ul>
 *   <li>POST /$admin/reset: $expunge everything (all resources and their history), then the
 *       start-up settings again.
 *   <li>POST /$admin/config {"page_size": N|null, "client_ids": bool|null, "validate": bool|null}:
 *       null restores the start-up value; returns the config.
 *   <li>GET /$admin/config.
 *   <li>GET /$admin/count: {"Type": n} current (not deleted) resources per type, read from the
 *       database tables, not through the FHIR API.
 *   <li>GET /$admin/versions: {"versions": n} resource versions stored (history rows, deletes
 *       included) other than Binary (bulk export output): every write that changed something.
 * </ul>
 */
final class AdminServlet extends HttpServlet {

    private static final ObjectMapper JSON = new ObjectMapper();

    private final IFhirSystemDao<?, ?> systemDao;
    private final JpaStorageSettings settings;
    private final DatabaseBackedPagingProvider paging;
    private final RestfulServer fhir;
    private final EntityManagerFactory emf;
    private final RequestValidatingInterceptor validator;
    private final boolean validateAtStart;
    private final int defaultPageSize;
    private final int maximumPageSize;
    private boolean validating = false;

    AdminServlet(ApplicationContext ctx, RestfulServer fhir, RequestValidatingInterceptor validator,
            boolean validateAtStart) {
        this.systemDao = ctx.getBean("mySystemDaoR4", IFhirSystemDao.class);
        this.settings = ctx.getBean(JpaStorageSettings.class);
        this.paging = ctx.getBean(DatabaseBackedPagingProvider.class);
        this.fhir = fhir;
        this.emf = ctx.getBean(EntityManagerFactory.class);
        this.validator = validator;
        this.validateAtStart = validateAtStart;
        this.defaultPageSize = paging.getDefaultPageSize();
        this.maximumPageSize = paging.getMaximumPageSize();
    }

    synchronized void applyDefaults() {
        HapiConfig.applyDefaults(settings);
        paging.setDefaultPageSize(defaultPageSize);
        paging.setMaximumPageSize(maximumPageSize);
        setValidating(validateAtStart);
    }

    private void setValidating(boolean on) {
        if (on && !validating) {
            fhir.registerInterceptor(validator);
        } else if (!on && validating) {
            fhir.unregisterInterceptor(validator);
        }
        validating = on;
    }

    private ObjectNode config() {
        ObjectNode out = JSON.createObjectNode();
        out.put("page_size", paging.getMaximumPageSize());
        out.put("default_page_size", paging.getDefaultPageSize());
        out.put("client_ids", settings.getResourceClientIdStrategy() != JpaStorageSettings.ClientIdStrategyEnum.NOT_ALLOWED);
        out.put("client_id_strategy", settings.getResourceClientIdStrategy().name());
        out.put("validate", validating);
        return out;
    }

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        if ("/config".equals(req.getPathInfo())) {
            synchronized (this) {
                reply(resp, 200, config());
            }
        } else if ("/count".equals(req.getPathInfo())) {
            reply(resp, 200, counts());
        } else if ("/versions".equals(req.getPathInfo())) {
            ObjectNode out = JSON.createObjectNode();
            out.put("versions", versions());
            reply(resp, 200, out);
        } else {
            error(resp, 404, "unknown admin path " + req.getPathInfo());
        }
    }

    @Override
    protected void doPost(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        String path = req.getPathInfo();
        if ("/reset".equals(path)) {
            synchronized (this) {
                long t0 = System.nanoTime();
                systemDao.expunge(new ExpungeOptions().setExpungeEverything(true), new SystemRequestDetails());
                applyDefaults();
                ObjectNode out = config();
                out.put("reset_ms", (System.nanoTime() - t0) / 1_000_000);
                reply(resp, 200, out);
            }
        } else if ("/config".equals(path)) {
            JsonNode body;
            try {
                body = JSON.readTree(req.getInputStream());
            } catch (IOException e) {
                error(resp, 400, "config body is not JSON");
                return;
            }
            if (body == null || !body.isObject()) {
                error(resp, 400, "config body must be a JSON object");
                return;
            }
            synchronized (this) {
                var names = body.fieldNames();
                while (names.hasNext()) {
                    String name = names.next();
                    JsonNode v = body.get(name);
                    switch (name) {
                        case "page_size" -> {
                            if (v.isNull()) {
                                paging.setDefaultPageSize(defaultPageSize);
                                paging.setMaximumPageSize(maximumPageSize);
                            } else if (v.isInt() && v.asInt() > 0) {
                                paging.setMaximumPageSize(v.asInt());
                                paging.setDefaultPageSize(Math.min(v.asInt(), defaultPageSize));
                            } else {
                                error(resp, 400, "page_size must be a positive integer or null");
                                return;
                            }
                        }
                        case "client_ids" -> {
                            boolean allow = v.isNull() ? !HapiConfig.noClientIds : v.asBoolean();
                            settings.setResourceClientIdStrategy(allow
                                    ? JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC
                                    : JpaStorageSettings.ClientIdStrategyEnum.NOT_ALLOWED);
                        }
                        case "validate" -> setValidating(v.isNull() ? validateAtStart : v.asBoolean());
                        default -> {
                            error(resp, 400, "unknown switch " + name);
                            return;
                        }
                    }
                }
                reply(resp, 200, config());
            }
        } else {
            error(resp, 404, "unknown admin path " + path);
        }
    }

    private ObjectNode counts() {
        ObjectNode out = JSON.createObjectNode();
        EntityManager em = emf.createEntityManager();
        try {
            List<Object[]> rows = em.createQuery(
                    "SELECT t.myResourceType, COUNT(t) FROM ResourceTable t WHERE t.myDeleted IS NULL"
                            + " GROUP BY t.myResourceType ORDER BY t.myResourceType", Object[].class)
                    .getResultList();
            for (Object[] row : rows) {
                out.put((String) row[0], ((Number) row[1]).longValue());
            }
        } finally {
            em.close();
        }
        return out;
    }

    private long versions() {
        EntityManager em = emf.createEntityManager();
        try {
            return em.createQuery(
                    "SELECT COUNT(h) FROM ResourceHistoryTable h WHERE h.myResourceType <> 'Binary'", Long.class)
                    .getSingleResult();
        } finally {
            em.close();
        }
    }

    private static void error(HttpServletResponse resp, int status, String message) throws IOException {
        ObjectNode out = JSON.createObjectNode();
        out.put("error", message);
        reply(resp, status, out);
    }

    private static void reply(HttpServletResponse resp, int status, JsonNode body) throws IOException {
        resp.setStatus(status);
        resp.setContentType("application/json");
        resp.getOutputStream().write(JSON.writeValueAsBytes(body));
    }
}
